"""The XFRM model: an SAD and an SPD behind one object, driven like the kernel.

:class:`Xfrm` runs ``ip xfrm state|policy`` lines (:meth:`Xfrm.execute`),
offers the XFRM operations as methods, runs the timers (:meth:`Xfrm.tick`)
and delivers events to subscribers (callbacks) and to pull-style queues
(:meth:`Xfrm.events`).  It also makes the decisions the dataplane asks for:
which SA an outbound packet takes (:meth:`Xfrm.outbound`, with ACQUIRE),
whether a decrypted packet passes the inbound policy check
(:meth:`Xfrm.inbound_check`) and when a NAT mapping changed
(:meth:`Xfrm.report_mapping`).

Sans-I/O: ``now`` is always passed in.  Events produced while a callback
runs are delivered after it returns, in order.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import ConfigError, XfrmError
from ..sa import PROTO_ESP, Encap, Mark, SAInfo, Selector
from .events import (
    GROUPS,
    AcquireEvent,
    Event,
    MappingEvent,
    MigrateEvent,
    PolicyEvent,
    PolicyExpireEvent,
    SAEvent,
    mark_json,
    sa_id_json,
    sa_to_json,
    selector_json,
)
from .parse import StateCommand
from .policy import Flow, Policy, Template, selector_matches
from .policy_parse import PolicyCommand, parse_xfrm_file
from .sad import LIVE, SAState, SecurityAssociationDatabase
from .spd import SecurityPolicyDatabase, policy_to_json

__all__ = ["Decision", "EventQueue", "MigrateEntry", "Xfrm"]

logger = logging.getLogger(__name__)

XFRM_MAX_QUEUE_LEN = 100  # the kernel's bound on packets held for a pending SA


@dataclass(frozen=True)
class Decision:
    """What to do with an outbound packet.

    ``action``: "encrypt" (with ``sa``, an engine SA), "clear", "drop",
    "block" or "queued" (held until the SA arrives, see
    :meth:`Xfrm.take_queued`).  ``acquire_seq``: the ACQUIRE this packet
    belongs to (0 when none was sent).  ``bundle``: every SA of the policy's
    templates, innermost first; ``sa`` is the outermost.
    """

    action: str
    sa: Any = None
    policy: Optional[Policy] = None
    acquire_seq: int = 0
    bundle: tuple = ()


@dataclass(frozen=True)
class MigrateEntry:
    """One ``struct xfrm_user_migrate``: SAs and templates from old to new addresses."""

    old_src: Any
    old_dst: Any
    new_src: Any
    new_dst: Any
    proto: int = PROTO_ESP
    mode: str = "tunnel"
    reqid: int = 0

    def to_json(self) -> dict:
        return {"old_src": str(self.old_src), "old_dst": str(self.old_dst),
                "new_src": str(self.new_src), "new_dst": str(self.new_dst),
                "proto": self.proto, "mode": self.mode, "reqid": self.reqid}


class EventQueue:
    """Undelivered events for a pull-style user: iterate (consumes) or :meth:`get`.
    Holds at most ``maxlen`` events; older ones are dropped and counted."""

    def __init__(self, groups: Optional[frozenset], maxlen: int = 10000) -> None:
        self.groups = groups
        self.dropped = 0
        self.closed = False
        self._queue: deque = deque()
        self._maxlen = maxlen

    def put(self, event: Event) -> None:
        if len(self._queue) >= self._maxlen:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(event)

    def get(self) -> Optional[Event]:
        return self._queue.popleft() if self._queue else None

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Event]:
        while self._queue:
            yield self._queue.popleft()

    def close(self) -> None:
        """Stop receiving (and stop counting as a listener)."""
        self.closed = True


def _groups(groups: Any) -> Optional[frozenset]:
    if groups is None:
        return None
    groups = frozenset([groups] if isinstance(groups, str) else groups)
    unknown = groups - set(GROUPS)
    if unknown:
        raise ConfigError(f"unknown event group(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(GROUPS)})")
    return groups


def _wants(groups: Optional[frozenset], event: Event) -> bool:
    return groups is None or bool(groups & event.groups)


class Xfrm:
    """SAD + SPD + events, with the kernel's tunables as keyword arguments.

    ``larval_drop``/``acquire_queue``: while an SA is being acquired, packets
    are held up to ``acquire_queue`` per acquire state when it is > 0; else,
    with ``larval_drop`` False, up to 100 (the kernel's XFRM_MAX_QUEUE_LEN);
    else dropped.  ``default``: the verdict per dir when no policy matches
    ({"in": "allow", ...}).  ``mapping_min_interval``: seconds between two
    MAPPING events of one SA for the same new address and port.
    """

    def __init__(self, *, acq_expires: float = 30, spi_expires: float = 60,
                 larval_drop: bool = True, acquire_queue: int = 0, replay_maxdiff: int = 2,
                 replay_maxage: float = 1.0, mapping_min_interval: float = 0.0,
                 default: Optional[dict] = None, rng: Optional[random.Random] = None) -> None:
        self.sad = SecurityAssociationDatabase(
            acq_expires=acq_expires, spi_expires=spi_expires, replay_maxdiff=replay_maxdiff,
            replay_maxage=replay_maxage, rng=rng)
        self.spd = SecurityPolicyDatabase(default)
        self.table = self.sad.table
        self.larval_drop, self.acquire_queue = larval_drop, acquire_queue
        self.mapping_min_interval = mapping_min_interval
        self._subscribers: dict[int, tuple[Callable, Optional[frozenset]]] = {}
        self._queues: dict[Optional[frozenset], EventQueue] = {}
        self._handles = 0
        self._pending: deque = deque()
        self._delivering = False
        # Bumped by every change to the SAD or the SPD (each one emits an event):
        # the dataplane's decision caches are valid for one generation.
        self.generation = 0

    # ------------------------------------------------------------ events

    def subscribe(self, callback: Callable[[Event], Any], groups: Any = None) -> int:
        """Call ``callback(event)`` for each event of ``groups`` (None: all); a handle."""
        self._handles += 1
        self._subscribers[self._handles] = (callback, _groups(groups))
        return self._handles

    def unsubscribe(self, handle: int) -> None:
        self._subscribers.pop(handle, None)

    def events(self, groups: Any = None) -> EventQueue:
        """The queue of undelivered events of ``groups`` (one queue per set of groups,
        created on first use; it counts as a listener until closed)."""
        key = _groups(groups)
        queue = self._queues.get(key)
        if queue is None or queue.closed:
            queue = self._queues[key] = EventQueue(key)
        return queue

    def listening(self, group: str) -> bool:
        """Does anyone receive events of ``group`` (a subscriber or an open queue)?"""
        return (any(g is None or group in g for _, g in self._subscribers.values())
                or any(not q.closed and (q.groups is None or group in q.groups)
                       for q in self._queues.values()))

    def _emit(self, events: list) -> list:
        if events:  # every change to the SAD or the SPD comes with an event
            self.generation += 1
        self._pending.extend(events)
        if not self._delivering:
            self._delivering = True
            try:
                while self._pending:
                    self._deliver(self._pending.popleft())
            finally:
                self._delivering = False
        return events

    def _deliver(self, event: Event) -> None:
        for queue in list(self._queues.values()):
            if not queue.closed and _wants(queue.groups, event):
                queue.put(event)
        for callback, groups in list(self._subscribers.values()):
            if _wants(groups, event):
                try:
                    callback(event)
                except Exception:  # a listener's bug must not break the model
                    logger.exception("event callback %r failed on %s", callback, event.type)

    def _sync(self) -> None:
        self._emit(self.sad.drain())

    # ------------------------------------------------------------ SAs

    def newsa(self, info: SAInfo, now: float) -> SAState:
        st = self.sad.newsa(info, now)
        self._emit([SAEvent("newsa", sa_to_json(st), ref=st)])
        return st

    def updsa(self, info: SAInfo, now: float) -> SAState:
        st = self.sad.updsa(info, now)
        self._emit([SAEvent("updsa", sa_to_json(st), ref=st)])
        return st

    def delsa(self, dst: Any, spi: int, proto: int = PROTO_ESP, mark: Any = None,
              now: float = 0.0) -> SAState:
        st = self.sad.delsa(dst, spi, proto, mark, now)
        self._emit([SAEvent("delsa", sa_to_json(st), ref=st)])
        return st

    def getsa(self, dst: Any, spi: int, proto: int = PROTO_ESP, mark: Any = None) -> SAState:
        return self.sad.lookup(dst, spi, proto, mark)

    def flushsa(self, proto: Optional[int] = None, now: float = 0.0) -> list[SAState]:
        gone = self.sad.flush(proto, now)
        if gone:  # xfrm_flush_sa: an empty flush sends nothing
            self._emit([SAEvent("flushsa", proto=proto or None)])
        return gone

    def allocspi(self, info: SAInfo, spi_min: int, spi_max: int, now: float,
                 lifetime_hard: Optional[float] = None) -> SAState:
        return self.sad.allocspi(info, spi_min, spi_max, now, lifetime_hard)

    def getae(self, dst: Any, spi: int, proto: int = PROTO_ESP, mark: Any = None) -> dict:
        return self.sad.getae(dst, spi, proto, mark)

    def newae(self, dst: Any, spi: int, proto: int = PROTO_ESP, mark: Any = None,
              now: float = 0.0, **replay: Any) -> SAState:
        """NEWAE: ``replay`` takes seq, oseq, seq_hi, oseq_hi, bitmap and current."""
        st = self.sad.newae(dst, spi, proto, mark, now=now, **replay)
        self._sync()
        return st

    def note_use(self, sa: Any, now: float) -> None:
        self.sad.note_use(sa, now)

    # ------------------------------------------------------------ policies

    def newpolicy(self, policy: Policy, now: float) -> Policy:
        stored = self.spd.add(policy, now)
        self._emit([PolicyEvent("newpolicy", policy_to_json(stored), ref=stored)])
        return stored

    def updpolicy(self, policy: Policy, now: float) -> Policy:
        stored = self.spd.add(policy, now, update=True)
        self._emit([PolicyEvent("updpolicy", policy_to_json(stored), ref=stored)])
        return stored

    def getpolicy(self, dir: str, selector: Optional[Selector] = None,
                  index: Optional[int] = None, mark: Optional[Mark] = None, if_id: int = 0,
                  ptype: str = "main") -> Policy:
        return self.spd.get(dir, selector, index, mark, if_id, ptype)

    def delpolicy(self, dir: str, selector: Optional[Selector] = None,
                  index: Optional[int] = None, mark: Optional[Mark] = None, if_id: int = 0,
                  ptype: str = "main") -> Policy:
        gone = self.spd.delete(dir, selector, index, mark, if_id, ptype)
        self._emit([PolicyEvent("delpolicy", policy_to_json(gone), ref=gone)])
        return gone

    def flushpolicy(self, dir: Optional[str] = None, ptype: str = "main") -> list[Policy]:
        gone = self.spd.flush(dir, ptype)
        if gone:
            self._emit([PolicyEvent("flushpolicy", dir=dir)])
        return gone

    # ------------------------------------------------------------ timers

    def tick(self, now: float) -> list[Event]:
        """Run every timer (SA, larval, acquire and policy lifetimes, AE events);
        the events produced, which subscribers and queues also receive."""
        events = self.sad.tick(now, aevents=self.listening("aevent"))
        events += [PolicyExpireEvent(policy_to_json(policy), hard, ref=policy)
                   for policy, hard in self.spd.tick(now)]
        return self._emit(events)

    # ------------------------------------------------------------ dataplane decisions

    def outbound(self, flow: Flow, now: float, mark: int = 0, if_id: int = 0,
                 packet: Any = None) -> Decision:
        """``xfrm_lookup`` for an outbound packet of ``flow``: the policy, then an SA per
        template; a missing SA starts (or waits for) an ACQUIRE.  ``packet`` (bytes,
        or a callable giving them, called only when the packet is held) is queued
        while acquiring when ``acquire_queue`` allows it."""
        action, policy = self.spd.verdict("out", flow, mark, if_id, now)
        if action == "block":
            return Decision("block", policy=policy)
        if policy is None or not policy.templates:
            return Decision("clear", policy=policy)
        bundle, seq = [], 0
        for template in policy.templates:
            st = self.sad.find_outbound(template, policy, flow)
            if st is not None:
                if st.use_time is None:  # xfrm_state_check_expire: the first use
                    self.sad.note_use(st, now)
                bundle.append(st.engine)
                continue
            acq = self._acquire(policy, template, flow, now)
            seq = seq or acq.seq
            if not template.optional:  # xfrm_tmpl_resolve_one stops at the first miss
                return self._hold(acq, policy, flow, mark, packet)
        if not bundle:
            return Decision("clear", policy=policy, acquire_seq=seq)
        # TODO(bundles): a policy with several templates needs every SA of the bundle
        # applied, innermost first; the dataplane applies only ``sa`` (the outermost).
        return Decision("encrypt", sa=bundle[-1], policy=policy, acquire_seq=seq,
                        bundle=tuple(bundle))

    def _acquire(self, policy: Policy, template: Template, flow: Flow, now: float) -> SAState:
        st, _ = self.sad.acquire(policy, template, flow, now)
        if not st.announced and self.listening("acquire"):
            seq = self.sad.announce(st)
            info = st.info
            pol = policy_to_json(policy)
            self._emit([AcquireEvent(
                seq, {"dst": str(info.dst), "proto": "esp", "spi": "0x00000000"},
                str(info.src), selector_json(info.selector), pol, pol["tmpl"],
                mark_json(policy.mark), policy.if_id, ref=st)])
        return st

    def _hold(self, acq: SAState, policy: Policy, flow: Flow, mark: int,
              packet: Optional[bytes]) -> Decision:
        limit = self.acquire_queue or (0 if self.larval_drop else XFRM_MAX_QUEUE_LEN)
        if limit and len(acq.queue) < limit:
            if packet is not None:
                acq.queue.append((packet() if callable(packet) else packet, flow, mark))
            return Decision("queued", policy=policy, acquire_seq=acq.seq)
        return Decision("drop", policy=policy, acquire_seq=acq.seq)

    def ready_queued(self) -> list[tuple]:
        """Packets (engine SA, packet, flow, mark) held while acquiring whose SA is
        now valid: the acquire state's queue moved onto the SA that answered it."""
        out = []
        queued, self.sad.queued = self.sad.queued, {}
        for st in queued.values():
            if st.queue and st.engine is not None and st.status in LIVE:
                out += [(st.engine, *item) for item in st.queue]
                st.queue = []
        return out

    def take_queued(self, sa: Any) -> list[tuple]:
        """Packets (packet, flow, mark) held while acquiring the SA ``sa`` now answers."""
        st = self.sad.state_of(sa)
        out, st.queue = st.queue, []
        return out

    def inbound_check(self, sa: Any, flow: Flow, now: float, mark: int = 0,
                      if_id: Optional[int] = None, dir: str = "in") -> bool:
        """``__xfrm_policy_check`` for a packet decrypted by ``sa`` (one SA deep):
        the SA's selector must match; then an allowing policy whose templates the SA
        satisfies (reqid 0 a wildcard), or, with no policy, the dir's default verdict
        (a tunnel-mode SA without a policy is refused, as by the kernel).  ``mark``
        is the packet's mark after the SA's set-mark; ``if_id`` defaults to the SA's.
        False for an SA that is gone meanwhile."""
        try:
            st = self.sad.state_of(sa)
        except XfrmError:
            return False
        if st.use_time is None:
            self.sad.note_use(st, now)
        if st.info.selector is not None and not selector_matches(st.info.selector, flow):
            return False
        if_id = st.info.if_id if if_id is None else if_id
        action, policy = self.spd.verdict(dir, flow, mark, if_id, now)
        if policy is None:
            return action == "allow" and st.info.mode == "transport"
        if action == "block" or (not policy.templates and self.spd.default[dir] == "block"):
            return False
        secpath, k = [st], 0
        for template in reversed(policy.templates):
            k = self._policy_ok(template, secpath, k, if_id)
            if k < 0:
                return False
        return all(s.info.mode == "transport" for s in secpath[k:])

    def _policy_ok(self, template: Template, secpath: list, start: int, if_id: int) -> int:
        """``xfrm_policy_ok``: the index after the SA that satisfies ``template``, the
        same index for a skipped optional template, or < 0."""
        first = start
        if template.optional:
            if template.mode == "transport":
                return start
        else:
            start = -1
        for idx in range(first, len(secpath)):
            st = secpath[idx]
            if self.sad.inbound_ok(template, st) and (not if_id or if_id == st.info.if_id):
                return idx + 1
            if st.info.mode != "transport":
                return -2 - idx if start == -1 else start
        return start

    def report_mapping(self, sa: Any, src_addr: Any, src_port: int,
                       now: float) -> Optional[MappingEvent]:
        """The engine flagged MAPPING on a good packet of ``sa`` from ``src_addr``:
        ``src_port``: emit MAPPING unless the same new address and port were reported
        less than ``mapping_min_interval`` ago (``km_new_mapping``)."""
        st = self.sad.state_of(sa)
        info, addr = st.info, ipaddress.ip_address(src_addr)
        if info.encap is None or st.status not in LIVE or (
                addr == info.src and src_port == info.encap.sport):
            return None
        last = st.mapping
        if (self.mapping_min_interval and last is not None
                and (last[1], last[2]) == (addr, src_port)
                and now - last[0] <= self.mapping_min_interval):
            return None
        st.mapping = (now, addr, src_port)
        event = MappingEvent(sa_id_json(info), info.reqid,
                             {"addr": str(info.src), "port": info.encap.sport},
                             {"addr": str(addr), "port": src_port}, ref=st)
        self._emit([event])
        return event

    # ------------------------------------------------------------ migrate

    def migrate(self, selector: Selector, dir: str, entries: list[MigrateEntry], now: float,
                encap: Optional[Encap] = None, if_id: int = 0,
                mark: Optional[Mark] = None) -> list[SAState]:
        """XFRM_MSG_MIGRATE: move the SAs and the templates of the policy (``dir``,
        ``selector``) from old to new outer addresses (and ``encap``)."""
        policy = self.spd.get(dir, selector, mark=mark, if_id=if_id)
        moved = []
        ip = ipaddress.ip_address
        for e in entries:
            st = self.sad.migrate_find(ip(e.old_src), ip(e.old_dst), e.proto, e.mode, e.reqid,
                                       if_id)
            if st is not None:
                self.sad.migrate_state(st, ip(e.new_src), ip(e.new_dst), now, encap)
                moved.append(st)
        templates = tuple(_migrate_template(t, entries) for t in policy.templates)
        if templates != policy.templates:
            self.spd.add(policy.replace(templates=templates), now, update=True)
        encap_json = None if encap is None else {
            "type": encap.type, "sport": encap.sport, "dport": encap.dport,
            "oa": None if encap.oa is None else str(encap.oa)}
        self._emit([MigrateEvent(selector_json(selector), dir,
                                 [e.to_json() for e in entries], encap_json, ref=moved)])
        return moved

    # ------------------------------------------------------------ ip xfrm lines

    def execute(self, line: str, now: float, show_keys: bool = False) -> dict:
        """Run one ``[ip xfrm] state|policy ...`` line; what ``--json`` would print:
        ``{}`` for changes, the SA or policy for get and allocspi, ``{"states": [...]}``
        or ``{"policies": [...]}`` for list, ``{"count": n}`` for count.  Keys are
        shown only with ``show_keys`` (and never with ``nokeys``)."""
        commands = parse_xfrm_file(line, "<xfrm>")
        if len(commands) != 1:
            raise ConfigError(f"execute takes one command, got {len(commands)}")
        return self.apply(commands[0], now, show_keys)

    def apply(self, command: Any, now: float, show_keys: bool = False) -> dict:
        """Run one parsed command (a ``StateCommand`` or ``PolicyCommand``), as
        :meth:`execute` does."""
        if isinstance(command, StateCommand):
            return self._state_command(command, now, show_keys)
        return self._policy_command(command, now)

    def _state_command(self, cmd: StateCommand, now: float, show_keys: bool) -> dict:
        verb = cmd.verb
        if verb in ("add", "update"):
            (self.newsa if verb == "add" else self.updsa)(cmd.info, now)
        elif verb == "allocspi":
            st = self.allocspi(cmd.info, cmd.spi_min, cmd.spi_max, now)
            return sa_to_json(st)
        elif verb == "get":
            return sa_to_json(self.getsa(cmd.dst, cmd.spi, cmd.proto, cmd.mark), show_keys)
        elif verb == "delete":
            self.delsa(cmd.dst, cmd.spi, cmd.proto, cmd.mark, now)
        elif verb == "list":
            states = self.sad.dump(cmd.src, cmd.dst, cmd.proto, cmd.spi, cmd.mode, cmd.reqid,
                                   cmd.flags)
            keys = show_keys and not cmd.nokeys
            return {"states": [sa_to_json(st, keys) for st in states]}
        elif verb == "flush":
            self.flushsa(cmd.proto, now)
        elif verb == "count":
            return {"count": self.sad.count()}
        return {}

    def _policy_command(self, cmd: PolicyCommand, now: float) -> dict:
        verb = cmd.verb
        if verb in ("add", "update"):
            (self.newpolicy if verb == "add" else self.updpolicy)(cmd.policy, now)
        elif verb in ("get", "delete"):
            named = (cmd.dir, cmd.selector, cmd.index, cmd.mark, cmd.if_id, cmd.ptype or "main")
            if verb == "get":
                return policy_to_json(self.getpolicy(*named))
            self.delpolicy(*named)
        elif verb == "list":
            return {"policies": [policy_to_json(p) for p in self.spd.dump() if cmd.matches(p)]}
        elif verb == "flush":
            self.flushpolicy(cmd.dir, cmd.ptype or "main")
        elif verb == "count":
            return {"count": len(self.spd)}
        return {}


def _migrate_template(template: Template, entries: list[MigrateEntry]) -> Template:
    """``migrate_tmpl_match``: a tunnel template with the old addresses gets the new."""
    for e in entries:
        if (template.mode == e.mode and template.proto == e.proto
                and (not e.reqid or template.reqid == e.reqid) and template.mode == "tunnel"
                and template.dst == ipaddress.ip_address(e.old_dst)
                and template.src == ipaddress.ip_address(e.old_src)):
            return Template(ipaddress.ip_address(e.new_dst), ipaddress.ip_address(e.new_src),
                            template.proto, template.spi, template.mode, template.reqid,
                            template.level)
    return template
